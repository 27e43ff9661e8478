//! Agent definitions and the status their brokers report.

use async_trait::async_trait;
use sqlx::types::Json;

use crate::dialect::{BindNow, for_each_backend, sql};
use crate::error::{Conflict, Entity, Invalid, StoreError, StoreResult};
use crate::ids::{AgentId, BrokerId};
use crate::model::{Agent, NewAgent, StatusReport};
use crate::rules::DELETED;

/// Keeps agent definitions.
#[async_trait]
pub trait AgentStore: Send + Sync {
    /// Defines an agent in phase `created`. `NotFound` for an unknown
    /// broker, `Conflict` if a live agent has the name.
    async fn create_agent(&self, agent: NewAgent) -> StoreResult<Agent>;

    async fn agent(&self, id: AgentId) -> StoreResult<Agent>;

    /// The agent that currently has this name (deleted agents give up
    /// their names).
    async fn agent_by_name(&self, name: &str) -> StoreResult<Agent>;

    /// Agents (deleted ones included), optionally of one broker, by name.
    async fn list_agents(&self, broker: Option<BrokerId>) -> StoreResult<Vec<Agent>>;

    /// Applies a status report of `broker` about one of its agents (phase,
    /// exit code and detail together), if its `seq` is newer than the last
    /// applied. `NotOwned` if the agent
    /// is another broker's, `NotFound` if there is none (nothing changes
    /// either way). Returns the agent after the report, and whether the
    /// report was applied.
    async fn apply_agent_status(
        &self,
        broker: BrokerId,
        agent: AgentId,
        report: StatusReport,
    ) -> StoreResult<(Agent, bool)>;

    /// Marks an agent deleted (after its broker confirmed the delete). Its
    /// name becomes free; status reports about it are ignored from now on.
    async fn mark_agent_deleted(&self, id: AgentId) -> StoreResult<Agent>;
}

for_each_backend! {
    #[async_trait]
    impl AgentStore for Backend {
        async fn create_agent(&self, agent: NewAgent) -> StoreResult<Agent> {
            let NewAgent {
                id,
                name,
                broker_id,
                command,
                env,
                labels,
            } = agent;
            if command.is_empty() {
                return Err(StoreError::Invalid(Invalid::EmptyCommand));
            }
            sqlx::query_as(sql!(
                "INSERT INTO agents
                     (id, name, broker_id, command, env, labels, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, @now, @now) RETURNING *"
            ))
            .bind(id)
            .bind(&name)
            .bind(broker_id)
            .bind(Json(command))
            .bind(Json(env))
            .bind(Json(labels))
            .bind_now()
            .fetch_one(&self.pool)
            .await
            .map_err(|e| match StoreError::from(e) {
                StoreError::Conflict(_) => StoreError::Conflict(Conflict::AgentName(name)),
                // The only reference an agent has is its broker.
                StoreError::Invalid(_) => StoreError::NotFound(Entity::Broker),
                other => other,
            })
        }

        async fn agent(&self, id: AgentId) -> StoreResult<Agent> {
            sqlx::query_as(sql!("SELECT * FROM agents WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .ok_or(StoreError::NotFound(Entity::Agent))
        }

        async fn agent_by_name(&self, name: &str) -> StoreResult<Agent> {
            sqlx::query_as(sql!(
                "SELECT * FROM agents WHERE name = $1 AND phase <> {deleted}",
                deleted = *DELETED
            ))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound(Entity::Agent))
        }

        async fn list_agents(&self, broker: Option<BrokerId>) -> StoreResult<Vec<Agent>> {
            Ok(sqlx::query_as(sql!(
                "SELECT * FROM agents WHERE $1 IS NULL OR broker_id = $1 ORDER BY name, created_at"
            ))
            .bind(broker)
            .fetch_all(&self.pool)
            .await?)
        }

        async fn apply_agent_status(
            &self,
            broker: BrokerId,
            agent: AgentId,
            report: StatusReport,
        ) -> StoreResult<(Agent, bool)> {
            let applied: Option<Agent> = sqlx::query_as(sql!(
                "UPDATE agents SET phase = $3, status_seq = $4, exit_code = $5, detail = $6,
                        updated_at = @now
                 WHERE id = $1 AND broker_id = $2 AND status_seq < $4 AND phase <> {deleted}
                 RETURNING *",
                deleted = *DELETED
            ))
            .bind(agent)
            .bind(broker)
            .bind(report.phase.as_str())
            .bind(report.seq)
            .bind(report.exit_code)
            .bind(report.detail)
            .bind_now()
            .fetch_optional(&self.pool)
            .await?;
            if let Some(row) = applied {
                return Ok((row, true));
            }
            let current = self.agent(agent).await?;
            if current.broker_id != broker {
                return Err(StoreError::NotOwned(Entity::Agent));
            }
            Ok((current, false))
        }

        async fn mark_agent_deleted(&self, id: AgentId) -> StoreResult<Agent> {
            sqlx::query_as(sql!(
                "UPDATE agents SET phase = {deleted},
                        updated_at = CASE WHEN phase = {deleted} THEN updated_at ELSE @now END
                 WHERE id = $1 RETURNING *",
                deleted = *DELETED
            ))
            .bind(id)
            .bind_now()
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound(Entity::Agent))
        }
    }
}
